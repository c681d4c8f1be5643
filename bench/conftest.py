import torch


def pytest_configure(config):
    torch.set_num_threads(2)  # the project's CPU reference machine; recorded in RESULTS.md
