"""PEFT adapters: read into patches (read.py), patches written as adapters (write.py), the names (names.py)."""
