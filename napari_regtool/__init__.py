"""napari-regtool: image registration in physical space — landmarks, linear, TPS and a deep deformable model."""
import os as _os

# OpenMP threads that wait by spinning lose their core to any other busy process and then stall every parallel
# region: measured here, a 512² deformable registration with torch's two threads took 13–50 s instead of 5 s while
# one other process ran. Passive waiting avoids that at no measurable cost when the machine is idle. It only takes
# effect if torch has not been imported yet (the `regtool` command and a fresh napari import this package first);
# a user's own OMP_WAIT_POLICY wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
