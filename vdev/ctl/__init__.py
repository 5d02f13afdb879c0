"""The control socket of a `vdev run` daemon, and `vdev ctl`, its client.

Not to be confused with `vdev.domain.control`, the core's private channel to a
driver-domain child. Modules: `protocol` (the line-delimited JSON requests, sans-I/O),
`snapshot` (a device's state and counters as JSON), `server` (the trio server),
`client` (connect, ask, read the reply) and `render` (the tables `vdev ctl` prints).
"""
