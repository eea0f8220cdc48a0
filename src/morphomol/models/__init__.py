"""Model parts shared by the studies (the studies assemble their own models from them):

* :mod:`.vit`          the ViT-S morph encoder run inside a model (token-level interface)
* :mod:`.mlp`          the zero-preserving expression MLP
* :mod:`.contrastive`  symmetric InfoNCE and a learnable temperature
"""
