"""`wfctl web`: a local web page of the user's runs (optional extra `wfd[web]`).

Imported only by the `web` command: nothing of aiohttp loads for other
commands or in the daemon. See `app.py`.
"""
