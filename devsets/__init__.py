"""The shipped development datasets (installed as ``matsciml.devsets``).

Built by ``matsciml devset build``; see README.md in this folder.
"""
