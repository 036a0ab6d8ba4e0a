"""From a file to pixels: safe reading and limits, decoding policy, GPU JPEG, preprocessing."""
