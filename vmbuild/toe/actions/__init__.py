"""Every Linux action module AWSTOE documents, by name."""

from __future__ import annotations

from vmbuild.toe.actions.base import ActionSpec
from vmbuild.toe.actions.exec import EXECUTE_BASH, EXECUTE_BINARY
from vmbuild.toe.actions.files import (
    APPEND_FILE,
    COPY_FILE,
    COPY_FOLDER,
    CREATE_FILE,
    CREATE_FOLDER,
    CREATE_SYMLINK,
    DELETE_FILE,
    DELETE_FOLDER,
    MOVE_FILE,
    MOVE_FOLDER,
)
from vmbuild.toe.actions.properties import (
    LIST_FILES,
    READ_FILE,
    SET_FILE_ENCODING,
    SET_FILE_OWNER,
    SET_FILE_PERMISSIONS,
    SET_FOLDER_OWNER,
    SET_FOLDER_PERMISSIONS,
)
from vmbuild.toe.actions.s3 import S3_DOWNLOAD, S3_UPLOAD, S3Config
from vmbuild.toe.actions.system import ASSERT, EXECUTE_DOCUMENT, REBOOT, UPDATE_OS
from vmbuild.toe.actions.web import WEB_DOWNLOAD

ACTIONS: dict[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        EXECUTE_BASH,
        EXECUTE_BINARY,
        EXECUTE_DOCUMENT,
        ASSERT,
        CREATE_FILE,
        APPEND_FILE,
        COPY_FILE,
        MOVE_FILE,
        COPY_FOLDER,
        MOVE_FOLDER,
        CREATE_FOLDER,
        CREATE_SYMLINK,
        DELETE_FILE,
        DELETE_FOLDER,
        LIST_FILES,
        READ_FILE,
        SET_FILE_ENCODING,
        SET_FILE_OWNER,
        SET_FOLDER_OWNER,
        SET_FILE_PERMISSIONS,
        SET_FOLDER_PERMISSIONS,
        REBOOT,
        UPDATE_OS,
        WEB_DOWNLOAD,
        S3_DOWNLOAD,
        S3_UPLOAD,
    )
}

# Documented by AWS for Windows only: named in the error so that a user knows why.
WINDOWS_ONLY = {"ExecutePowerShell", "SetRegistry", "InstallMSI", "UninstallMSI"}

__all__ = ["ACTIONS", "WINDOWS_ONLY", "ActionSpec", "S3Config"]
