/*
 * capsule-replay - offline recovery and inspection of a capsule data directory (see
 * ARCHITECTURE.md, "capsule-replay"). main() only dispatches to the subcommands.
 */
#include <string.h>

#include "replay.h"

static const struct {
    const char *name;
    int (*fn)(int argc, char **argv);
} cmds[] = {
    {"verify", rp_cmd_verify},   {"export", rp_cmd_export}, {"sessions", rp_cmd_list},
    {"executions", rp_cmd_list}, {"promises", rp_cmd_list}, {"repair", rp_cmd_repair},
    {"compact", rp_cmd_compact}, {"show", rp_cmd_show},     {"replay", rp_cmd_replay},
};

int main(int argc, char **argv)
{
    if (argc < 2)
        return rp_usage_error("", "a COMMAND is needed"), RP_EXIT_USAGE;
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        rp_usage_print(stdout, argc > 2 ? argv[2] : NULL);
        return 0;
    }
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
        if (strcmp(argv[1], cmds[i].name))
            continue;
        if (rp_wants_help(argc - 1, argv + 1)) {
            rp_usage_print(stdout, cmds[i].name);
            return 0;
        }
        return cmds[i].fn(argc - 1, argv + 1);
    }
    return rp_usage_error(argv[1], "unknown command");
}
