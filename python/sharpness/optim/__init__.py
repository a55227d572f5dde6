"""Torch optimizers of the SAM family (one module per method family)."""

from sharpness.optim.adasam import AdaSAM
from sharpness.optim.aesam import AESAM
from sharpness.optim.bsam import BayesianSAM
from sharpness.optim.crsam import CRSAM
from sharpness.optim.esam import ESAM
from sharpness.optim.friendly import FriendlySAM
from sharpness.optim.gam import GAM
from sharpness.optim.gsam import GSAM
from sharpness.optim.lets import LETS
from sharpness.optim.lightsam import LightSAM
from sharpness.optim.looksam import EveryKSAM, LookSAM
from sharpness.optim.monge import MongeSAM
from sharpness.optim.msam import MSharpnessSAM
from sharpness.optim.rsam import RandomSAM
from sharpness.optim.sam import SAM
from sharpness.optim.sampa import SAMPa
from sharpness.optim.ssam import SSAMD, SSAMF
from sharpness.optim.wsam import WSAM

__all__ = [
    "SAM", "EveryKSAM", "LookSAM", "MSharpnessSAM", "SAMPa", "AESAM", "ESAM", "LETS", "LightSAM", "AdaSAM", "GAM", "CRSAM",
    "BayesianSAM", "GSAM", "FriendlySAM", "WSAM", "RandomSAM", "MongeSAM", "SSAMF", "SSAMD",
]
