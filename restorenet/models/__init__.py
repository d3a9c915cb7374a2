"""Reference models, one file each. Importing this package registers every model."""
from restorenet.models import nafnet  # noqa: F401  (building block, also AdaRevD's encoder)
from restorenet.models import adarevd  # noqa: F401
from restorenet.models import mhnet  # noqa: F401
from restorenet.models import hyperres  # noqa: F401
from restorenet.models import constyle_nafnet  # noqa: F401
from restorenet.models import ddsnet  # noqa: F401
