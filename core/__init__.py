"""What every app shares and no app owns: the low layer (it imports no app)."""
