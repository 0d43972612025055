"""Methods register themselves in METHODS on import; one line per method module."""

import selfsup.methods.barlow_twins  # noqa: F401
import selfsup.methods.byol  # noqa: F401
import selfsup.methods.cmc  # noqa: F401
import selfsup.methods.cpc  # noqa: F401
import selfsup.methods.dino  # noqa: F401
import selfsup.methods.distill  # noqa: F401
import selfsup.methods.emp_ssl  # noqa: F401
import selfsup.methods.instdisc  # noqa: F401
import selfsup.methods.invaspread  # noqa: F401
import selfsup.methods.moco  # noqa: F401
import selfsup.methods.moco_v3  # noqa: F401
import selfsup.methods.simclr  # noqa: F401
import selfsup.methods.simsiam  # noqa: F401
import selfsup.methods.supcon  # noqa: F401
import selfsup.methods.supervised  # noqa: F401
import selfsup.methods.swav  # noqa: F401
import selfsup.methods.unigrad  # noqa: F401
import selfsup.methods.vicreg  # noqa: F401
from selfsup.methods.base import Method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views

__all__ = ["Method", "Progress", "Views", "with_gradient_terms"]


def with_gradient_terms() -> list[str]:
    """The registered methods that have a gradient decomposition (`Method.gradient_terms`)."""
    return [name for name in METHODS.names() if METHODS.get(name).has_gradient_terms()]
