"""The local control API (docs/PROTOCOL.md §9): how the CLI and the desktop app talk to a running engine,
relay or exit, over a 0600 Unix socket with line-delimited JSON.  The app's one door into the core.

    api.py       the vocabulary (pure), in one import: states and the status snapshot (state.py), error
                 kinds (errors.py), the engine's settings (config.py), the greeting, requests and replies
                 with their codec (messages.py)
    server.py    ControlServer (engine, relay, exit): decodes requests and hands them to typed handlers
    client.py    ControlClient (CLI, app)
    paths.py     default_socket: where the engine listens

Nothing is imported here, so the pure vocabulary modules load without the asyncio server and client.
"""
