"""tcmu-py: userspace SCSI devices for Linux LIO, served through the kernel's TCMU ring."""

__version__ = "0.1.0"
