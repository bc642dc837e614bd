"""wfctl: the command-line client of wfd."""
