"""Replicated disks (subtype ``mirror``): see `.mirror` for the format and ordering rules."""
