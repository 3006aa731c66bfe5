"""The component engine's hard cases in a real guest (the shared VM): a reboot
asked for by exit code 194 in the middle of a document, a retry that succeeds on
its second attempt, and a step that times out in the guest.

The Reboot action goes through the same `Remote.reboot()` and is covered by the
unit tests; a second reboot here would cost another minute of the VM budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmbuild.remote.ssh import SSHSession
from vmbuild.toe import Status, load_document, run_document

pytestmark = pytest.mark.vm

CORPUS = Path(__file__).resolve().parents[1] / "data" / "toe" / "corpus" / "valid"

ENGINE = """
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: BootBefore
        action: ExecuteBash
        inputs: {{commands: [cat /proc/sys/kernel/random/boot_id, rm -f /var/tmp/vmbuild-attempts]}}
      - name: GuideRebootExample
        action: ExecuteDocument
        inputs:
          document: {exit194}
      - name: BootAfter194
        action: ExecuteBash
        inputs: {{commands: [cat /proc/sys/kernel/random/boot_id]}}
      - name: RebootedOnce
        action: Assert
        inputs:
          not:
            stringEquals: '{{{{ build.BootBefore.outputs.stdout }}}}'
            value: '{{{{ build.BootAfter194.outputs.stdout }}}}'
      - name: SucceedsOnSecondAttempt
        action: ExecuteBash
        maxAttempts: 3
        inputs:
          commands:
            - |
              n=$(( $(cat /var/tmp/vmbuild-attempts 2>/dev/null || echo 0) + 1 ))
              echo "$n" > /var/tmp/vmbuild-attempts
              echo "attempt $n"
              [ "$n" -ge 2 ]
      - name: TimesOut
        action: ExecuteBash
        timeoutSeconds: 5
        onFailure: Ignore
        inputs:
          commands:
            - echo started
            - sleep 120
      - name: SleepWasKilled
        action: ExecuteBash
        inputs:
          commands:
            - |
              for f in /proc/[0-9]*/cmdline; do
                if tr '\\0' ' ' < "$f" 2>/dev/null | grep -q '^sleep 120'; then
                  echo "the timed-out command is still running" >&2; exit 1
                fi
              done
              echo "the timed-out command was killed in the guest"
"""


def test_reboots_retries_and_timeouts_in_a_real_guest(guest: SSHSession, tmp_path: Path) -> None:
    # AWSTOE resolves a child path on the instance or next to the parent
    # document, never on the machine that launched it: the child sits beside it.
    (tmp_path / "exit-code-194.yaml").write_bytes((CORPUS / "exit-code-194.yaml").read_bytes())
    doc_path = tmp_path / "engine.yaml"
    doc_path.write_text(ENGINE.format(exit194="exit-code-194.yaml"))
    lines: list[str] = []
    result = run_document(load_document(doc_path), guest, phases=["build"], on_output=lines.append)
    log = "\n".join(lines)
    steps = {s.name: s for s in result.phases[0].steps}
    assert result.status is Status.SUCCESS_WITH_IGNORED_FAILURE, log
    assert all(s.status is Status.SUCCESS for n, s in steps.items() if n != "TimesOut"), log

    # exit 194 inside the nested guide example: one reboot, the same step ran again
    nested = steps["GuideRebootExample"].nested[0].phases[0].steps[0]
    assert (nested.reboots, nested.attempts) == (1, 1)
    assert "The reboot file does not exist. Creating it and triggering a restart." in log
    assert (
        nested.outputs["stdout"] == "The reboot file exists. Deleting it and exiting with success."
    )

    retry = steps["SucceedsOnSecondAttempt"]
    assert (retry.attempts, retry.outputs["stdout"]) == (2, "attempt 2")

    timeout = steps["TimesOut"]
    assert timeout.status is Status.IGNORED_FAILURE
    assert timeout.failure_message == "timed out after 5s (timeoutSeconds)"
    assert timeout.duration < 60
    assert "[build/TimesOut] started" in log

    detail = result.to_detailed_output()
    json.dumps(detail)
    assert (
        detail["documents"][0]["phases"][0]["steps"][1]["detailedOutput"][0]["status"] == "Success"
    )
