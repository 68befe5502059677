import os
import shutil
import uuid

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/lab/" in str(item.fspath):
            item.add_marker(pytest.mark.lab)


@pytest.fixture
def netns():
    """A throwaway network namespace, always deleted."""
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.fail("lab tests need root and nftables (run `make test` as root)")
    from nlbfarm.node import iplib
    name = f"nft-{uuid.uuid4().hex[:8]}"
    iplib.ensure_netns(name)
    try:
        yield name
    finally:
        iplib.delete_netns(name)



@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can tell a passed test."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
