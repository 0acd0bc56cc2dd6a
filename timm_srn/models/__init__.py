"""SRN models; importing registers them with timm."""
from .class_maps import class_activation_maps, feature_layout, token_grid
from .srn import ClassCountError, SRN, SRN_CLASSIFIERS, SRNOutput, SpatialAttention, SpatialRegularizer, srn_stage_loss
