"""The wire-level fake Discord and a launcher for the real bot process, shared by the wire tests and the benchmarks
that measure the bot as members feel it."""
