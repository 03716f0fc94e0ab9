"""The pure saga state machine: standard library only, no I/O, no clock."""
