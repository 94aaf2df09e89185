"""Training-free few-shot adapters on CLIP features: GDA and Tip-Adapter.

`fit(features, labels, ...) -> params` (a NamedTuple pytree) and
`predict(params, features) -> logits`; hyper-parameters are chosen on a
validation split with `clipjax.adapt.search`.
"""

from clipjax.adapt import gda, search, tip_adapter
from clipjax.adapt.gda import GDAParams
from clipjax.adapt.search import GDA_ALPHAS, accuracy, select_gda_alpha, select_tip_alpha_beta, tip_grid
from clipjax.adapt.tip_adapter import TipAdapterParams

__all__ = [
    "GDAParams",
    "GDA_ALPHAS",
    "TipAdapterParams",
    "accuracy",
    "gda",
    "search",
    "select_gda_alpha",
    "select_tip_alpha_beta",
    "tip_adapter",
    "tip_grid",
]
