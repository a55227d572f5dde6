"""The numpy front: SAM-family optimizers over lists of numpy arrays, updated in place.

The arithmetic runs in the native kernels (:mod:`sharpness._core`), one call per dtype over all
arrays; see :class:`SAM`.
"""

from sharpness.numpy.aesam import AESAM
from sharpness.numpy.curvature import CRSAM, GAM
from sharpness.numpy.lets import LETS
from sharpness.numpy.lightsam import LightSAM
from sharpness.numpy.looksam import EveryKSAM, LookSAM
from sharpness.numpy.msam import MSharpnessSAM
from sharpness.numpy.projected import GSAM, WSAM, FriendlySAM, MongeSAM
from sharpness.numpy.rsam import RandomSAM
from sharpness.numpy.sam import SAM
from sharpness.numpy.sampa import SAMPa
from sharpness.numpy.ssam import SSAMD, SSAMF
from sharpness.numpy.standalone import AdaSAM, BayesianSAM

__all__ = ["SAM", "AESAM", "EveryKSAM", "LookSAM", "SAMPa", "LightSAM", "MSharpnessSAM"]
__all__ += ["GSAM", "FriendlySAM", "WSAM", "MongeSAM", "AdaSAM", "BayesianSAM"]
__all__ += ["SSAMF", "SSAMD", "GAM", "CRSAM"]
__all__ += ["LETS"]
__all__ += ["RandomSAM"]
