"""What every stage shares and no stage owns: errors, files, resume, sharding, prefetch, image
reading, devices, palette, boxes, vocabularies, pictures and the command-line flag groups."""
