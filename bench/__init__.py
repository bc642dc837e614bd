"""wfd's benchmark: wfd against a raw `subprocess` floor, a durable floor and the peers.

Run `python -m bench` (see bench/README.md). Nothing here is imported by wfd or wfctl.
"""
