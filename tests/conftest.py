"""Shared fixtures: namespace labs, the fake apiserver and the kproxy agent runner."""

pytest_plugins = ["tests.support.lab", "tests.support.fakeapi", "tests.support.agent"]
