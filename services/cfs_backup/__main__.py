from cfs_backup.service import main

main()
