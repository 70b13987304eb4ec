from cfs_alerts.service import main

main()
