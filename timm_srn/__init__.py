"""timm-srn: Spatial Regularization Networks and spatial consistency losses for timm.

timm has no plugin discovery: `import timm_srn` registers the `srn*` models with timm.
"""
from .version import __version__, check_timm

check_timm()
from .models import SRN, SRNOutput, class_activation_maps, srn_stage_loss
from .task import SinglePositiveTask
from .losses import HeatmapBuffer, HeatmapSource, SpatialConsistencyLoss, create_single_positive_loss
