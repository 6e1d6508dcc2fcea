"""When ``iabn_sync`` with the compiled package hands an input to the package's sync
kernels, and when to the PyTorch code: the package refuses one value per channel on a
process (one image per GPU through the ASPP's 1x1 image pooling) although the statistics
over all processes are well defined. The package is not needed: the rule is a function."""
import pytest

from modules.norm import package_sync_path


@pytest.mark.parametrize("training,group_size", [(False, 4), (True, 1)])
def test_no_synchronisation_leaves_it_to_the_package(training, group_size):
    assert package_sync_path(training, group_size, True, (1, 256, 1, 1)) == "local"


def test_one_image_per_gpu_through_a_1x1_map_goes_to_the_pytorch_sync():
    assert package_sync_path(True, 2, True, (1, 256, 1, 1)) == "torch"
    assert package_sync_path(True, 2, True, (1, 256)) == "torch"


@pytest.mark.parametrize("shape", [(1, 256, 2, 1), (2, 256, 1, 1), (1, 64, 33, 33)])
def test_more_than_one_value_per_channel_goes_to_the_package(shape):
    assert package_sync_path(True, 2, True, shape) == "package"


def test_the_package_synchronises_only_cuda_tensors():
    assert package_sync_path(True, 2, False, (4, 8, 16, 16)) == "torch"
