"""The agent's error hierarchy, with the reference agent's names, messages and status codes.

Every error that can reach Ironic serialises as ``{type, code, message, details}``; the API
maps it to ``{"faultcode", "faultstring"}`` with ``status_code`` as the HTTP status.
"""

from __future__ import annotations

from typing import Any


class RESTError(Exception):
    """Base class for errors reported over the API."""

    message = "An error occurred"
    details = "An unexpected error occurred. Please try back later."
    status_code = 500
    serializable_fields = ("type", "code", "message", "details")

    def __init__(self, details: Any = None, *args: Any) -> None:
        super().__init__(*args)
        self.type = type(self).__name__
        self.code = self.status_code
        if details:
            self.details = str(details)

    def __str__(self) -> str:
        return f"{self.message}: {self.details}"

    def serialize(self) -> dict[str, Any]:
        """The JSON form Ironic reads in ``command_error``."""
        return {"type": self.type, "code": self.code, "message": self.message,
                "details": self.details}


class InvalidContentError(RESTError):
    """The request body cannot be parsed or does not validate."""

    message = "Invalid request body"
    status_code = 400


class InvalidCommandError(InvalidContentError):
    """An unknown or malformed command name."""

    message = "Invalid command"


class InvalidCommandParamsError(InvalidContentError):
    """Command parameters are missing, unknown or of the wrong type."""

    message = "Invalid command parameters"


class NotFound(RESTError):
    """A non-existent API object or endpoint."""

    message = "Not found"
    details = "The requested URL was not found."
    status_code = 404


class RequestedObjectNotFoundError(NotFound):
    """A named object (extension, command result) does not exist."""

    def __init__(self, type_descr: str, obj_id: str) -> None:
        super().__init__(f"{type_descr} with id {obj_id} not found.")


class CommandExecutionError(RESTError):
    """A command failed to execute."""

    message = "Command execution failed"


class ContainerNotPermittedError(CommandExecutionError):
    """A container step named an image that ``[container] allowed_containers`` lacks."""

    message = "Container image not permitted"

    def __init__(self, container_url: str) -> None:
        super().__init__(f"Container image {container_url} is not in [container]"
                         "allowed_containers and [container]allow_arbitrary_containers is "
                         "not enabled.")


class AgentIsBusy(CommandExecutionError):
    """Another asynchronous command is still running."""

    message = "Agent is busy"
    status_code = 409

    def __init__(self, command_name: str) -> None:
        super().__init__(f"executing command {command_name}")


class IronicAPIError(RESTError):
    """A call to the Ironic API failed."""

    message = "Error in call to ironic-api"


class HeartbeatError(IronicAPIError):
    message = "Error heartbeating to agent API"


class HeartbeatConflictError(IronicAPIError):
    message = "ConflictError heartbeating to agent API"


class HeartbeatConnectionError(IronicAPIError):
    message = "Error attempting to heartbeat - Possible transitory network failure"


class LookupNodeError(IronicAPIError):
    message = "Error getting configuration from Ironic"


class LookupAgentIPError(IronicAPIError):
    message = "Error finding IP for Ironic Agent"


class ImageDownloadError(RESTError):
    message = "Error downloading image"

    def __init__(self, image_id: str, msg: str) -> None:
        super().__init__(f"Download of image {image_id} failed: {msg}")


class ImageChecksumError(RESTError):
    message = "Error verifying image checksum"
    details_str = ("Image failed to verify against checksum. location: {}; image ID: {}; "
                   "image checksum: {}; verification checksum: {}")

    def __init__(self, image_id: str, image_location: str, checksum: str,
                 calculated_checksum: str) -> None:
        super().__init__(self.details_str.format(image_location, image_id, checksum,
                                                 calculated_checksum))


class ImageWriteError(RESTError):
    message = "Error writing image to device"

    def __init__(self, device: str, exit_code: int | None, stdout: str, stderr: str) -> None:
        super().__init__(f"Writing image to device {device} failed with exit code {exit_code}. "
                         f"stdout: {stdout}. stderr: {stderr}")


class SystemRebootError(RESTError):
    message = "Error rebooting system"

    def __init__(self, exit_code: int | None, stdout: str, stderr: str) -> None:
        super().__init__(f"Reboot script failed with exit code {exit_code}. stdout: {stdout}. "
                         f"stderr: {stderr}")


class InstanceDeployFailure(RESTError):
    """Preparing the instance (partitions, config drive) failed."""

    message = "Failed to deploy instance"


class BlockDeviceEraseError(RESTError):
    message = "Error erasing block device"


class BlockDeviceError(RESTError):
    message = "Block device caused unknown error"


class SoftwareRAIDError(RESTError):
    message = "Software RAID caused unknown error"


class VirtualMediaBootError(RESTError):
    message = "Configuring agent from virtual media failed"


class ExtensionError(RESTError):
    pass


class UnknownNodeError(RESTError):
    message = "Agent is not associated with an Ironic node"


class HardwareManagerNotFound(RESTError):
    message = "No valid HardwareManager found"


class HardwareManagerMethodNotFound(RESTError):
    message = "No HardwareManager found to handle method"

    def __init__(self, method: str) -> None:
        super().__init__(f"Could not find method: {method}")


class HardwareManagerConfigurationError(RESTError):
    """A hardware manager's configuration (e.g. the container steps file) is unusable."""

    message = "Hardware manager configuration error"


class IncompatibleHardwareMethodError(RESTError):
    message = "HardwareManager method is not compatible with hardware"


class IncompatibleNumaFormatError(RESTError):
    message = "Error in NUMA node data format"


class CleaningError(RESTError):
    message = "Clean step failed"


class ProtectedDeviceError(CleaningError):
    """Cleaning stopped: a disk holds a shared cluster filesystem (VMFS, GFS2, ...)."""

    message = "Protected device located, cleaning aborted"

    def __init__(self, device: str, what: str) -> None:
        self.device, self.what = device, what
        super().__init__(
            f"Protected {what} located on device {device}. This volume or its contents may "
            "be a shared block device. Please consult your storage administrator, and "
            "restart cleaning after either detaching the volume, or instructing the agent "
            "not to protect such contents (the agent option guard_special_filesystems, "
            "kernel parameter ipa-guard-special-filesystems=0).")


class DeploymentError(RESTError):
    message = "Deploy step failed"


class ServicingError(RESTError):
    """A service step failed."""

    message = "Service step failed"


class InvalidImage(DeploymentError):
    """The image (or what deploying it needs) fails validation or the agent's policy."""

    message = "The provided image is not valid for use"


class ClockSyncError(RESTError):
    message = "Error syncing system clock"


class DeviceNotFound(NotFound):
    message = "Error finding the disk or partition device to deploy the image on"


class ISCSIError(RESTError):
    message = "Error starting iSCSI target"


class ISCSICommandError(ISCSIError):
    def __init__(self, error_msg: str, exit_code: int | None, stdout: str, stderr: str) -> None:
        super().__init__(f"{error_msg} Exit code: {exit_code}. stdout: {stdout}. "
                         f"stderr: {stderr}")


class VersionMismatch(RESTError):
    """Hardware manager versions changed since Ironic fetched the steps."""

    message = ("Hardware managers version mismatch, reload agent with correct version")

    def __init__(self, agent_version: Any, node_version: Any) -> None:
        self.agent_version, self.node_version = agent_version, node_version
        super().__init__(f"Current versions: {agent_version}, versions used by ironic: "
                         f"{node_version}")


class InspectionError(Exception):
    """Failure during inspection."""
