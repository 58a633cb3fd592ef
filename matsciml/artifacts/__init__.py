"""Trained models as files: checkpoints and exported packages, written atomically and loaded without
running code from the file (class resolution in :mod:`.trust`, allocation bounds in :mod:`.build_budget`)."""
