"Settings every test shares: nothing from a hub, plots without a screen."

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def serving():
    "Start servers on free loopback ports: `serving(app)` gives its URL; all stop after the test."
    from llmbook.deployment import LocalServer
    from serving import wait_until_ready

    servers = []

    def start(app):
        server = LocalServer(app)
        url = server.__enter__()
        servers.append(server)
        wait_until_ready(url)
        return url

    yield start
    for server in servers:
        server.__exit__(None, None, None)
