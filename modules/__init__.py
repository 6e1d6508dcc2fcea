"""Network pieces: ResNet body, residual blocks, DeepLab-v3 head, norm + activation layers."""
from .deeplab import ASPP_DILATIONS, DeeplabV3, eval_pooling_padding  # noqa: F401
from .norm import (  # noqa: F401
                   ABN,
                   NORM_ACTS,
                   NORM_IMPLS,
                   BatchNorm2dAct,
                   InPlaceABN,
                   InPlaceABNSync,
                   NormImplError,
                   inplace_abn_available,
                   is_norm_layer,
                   norm_act_factory,
                   resolve_norm_impl,
)
from .residual import ResidualBlock  # noqa: F401
from .resnet import RESNET_STRUCTURES, ResNet, make_resnet  # noqa: F401
