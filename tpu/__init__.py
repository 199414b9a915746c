"""Scripts that create, set up, launch on, watch and delete TPU VMs and pod slices."""
