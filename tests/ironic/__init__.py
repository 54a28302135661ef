"""A real Ironic (from its own virtualenv, ``.venv-ironic``) as a peer for integration tests."""
