"""OpenSDS CSI plugin (block.csi.opensds.io): identity, controller and node services."""
