# The dropin that makes the agent find the example manager.
from business_logic_manager import BusinessLogicHardwareManager

companyx = BusinessLogicHardwareManager()
