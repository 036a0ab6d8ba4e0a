"""The CUDA-only parts of the engine: the device JPEG decoder's thread
(:mod:`.device_decode`), page-locking host memory (:mod:`.host_memory`), reading results
back from the device (:mod:`.readback`) and the benchmark's device sampler
(:mod:`.sampler`).  Everything here runs behind ``device.type == "cuda"`` (on the CPU the
same code runs as a stand-in, which is how it is tested)."""
