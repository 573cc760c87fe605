"""The demo: `aza-gateway demo` and the fake OpenAI upstream it serves.

- `command`: the demo command (one port, temporary SQLite, demo practice and key).
- `fake_upstream`: the fake OpenAI API as an ASGI app, with the knobs tests steer.
- `answers`: what the fake answers to text requests (chat, completions, responses).
- `media`: what it answers to embeddings, audio, images, moderations and models.
- `sse`: the server-sent event writer the fake streams with.

Nothing in the runtime gateway imports this package; the tests, the bench and
the CLI's `demo` command do.
"""
