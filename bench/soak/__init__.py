"""The kill -9 soak: the real bot and its GPU worker (tiny model, CPU) driven through the wire-level fake Discord by
members' /imagine, /train and cancels, while either process is killed at random moments; after each restart and at
the end it checks that no job was lost, none ran forever, none was announced twice and the SQLite file is intact.
`python -m bench.soak --help`; docs/RELIABILITY.md has the command and the figures."""
