"""testinfra checks of the ctr-hello image: they run in the image's root filesystem (all its
layers, mounted in the builder VM), not in the builder's own."""


def test_the_greeting_is_there(host):
    greeting = host.file("/etc/vmbuild-hello")
    assert greeting.is_file and greeting.content_string == "hi from vmbuild"


def test_motd_removed_and_the_service_user_added(host):
    assert not host.file("/etc/motd").exists
    assert host.user("svc").shell == "/usr/sbin/nologin"


def test_the_package_database_is_the_images(host):
    assert host.package("bash").is_installed
    # The builder VM has cloud-init; the minbase image does not.
    assert not host.package("cloud-init").is_installed
