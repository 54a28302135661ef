"""The image pipeline: download, verify, convert and write OS images."""
