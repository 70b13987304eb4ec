from cfs_conflicts.service import main

main()
