"""Reports made from run folders and studies: test-split summaries with paired-bootstrap
intervals, training-dynamics plots and search plots. ``analysis/`` holds their command-line
entry points; ``clipse.final`` uses them to write a study's report."""
