"""Media workers: one pjsua2 B2BUA process per active call, and the pool that runs them.

`protocol` is the contract with the edge (stdlib only); `pool` is asyncio and never
imports pjsua2; `worker` is the child process and the only module that loads pjsua2,
so a worker crash or a pjlib abort takes down one call, never the edge.
"""
