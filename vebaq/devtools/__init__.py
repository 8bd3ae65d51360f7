"""Tools for trying vebaq and developing it, on top of everything else: ``vebaq dev`` (the whole
pipeline in one terminal), the embedded broker (fakeredis: the only module that needs it), the
fake vROps server and the compose demo's driver. Nothing below the CLI imports these."""
