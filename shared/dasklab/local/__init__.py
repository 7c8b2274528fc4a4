"""The local lab: a Pub/Sub emulator, a functions-framework server and timers on this machine."""
