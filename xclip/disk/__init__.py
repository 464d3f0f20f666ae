"""Files on disk: atomic writes, full disks, locks, digests and text files."""
