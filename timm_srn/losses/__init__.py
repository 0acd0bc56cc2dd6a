"""Single-positive multi-label criteria and the heatmap buffer."""
from .baselines import (
    EXPECTED_POSITIVES, SINGLE_POSITIVE_LOSSES, AssumeNegativeLoss, EntropyMaximizationLoss, ExpectedPositiveLoss,
    LargeLossLoss, RoleLoss, WeakAssumeNegativeLoss, create_single_positive_loss, loss_options)
from .heatmap_buffer import HeatmapBuffer, write_ema
from .heatmap_source import HeatmapSource
from .spatial_consistency import SpatialConsistencyLoss
from .srn_stage import SRNStageLoss
