"""The reference models: our own ResNet, HMMN (STM / KMN / HMMN matching) and DMN-AOA's memory layers."""
from .dmn import AdaptiveObjectAlignment, TemplateDecoder
from .hmmn import HMMN, HMMNConfig, load_model, save_checkpoint
from .resnet import BACKBONES, BackboneConfig, ResNet

__all__ = ["HMMN", "HMMNConfig", "load_model", "save_checkpoint", "ResNet", "BackboneConfig", "BACKBONES",
           "TemplateDecoder", "AdaptiveObjectAlignment"]
