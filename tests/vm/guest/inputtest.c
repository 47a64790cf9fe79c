/*
 * inputtest: the DomU side of the VM input scenario. Finds the input devices Linux's
 * xen-kbdfront registers ("Xen Virtual Keyboard", "Xen Virtual Pointer", "Xen Virtual
 * Multi-touch") among /dev/input/event*, prints their absolute ranges, then prints every
 * event they report for SECONDS seconds:
 *
 *   inputtest SECONDS
 *
 *   INPUTTEST DEVICE kbd|ptr|mt <path> <name>
 *   INPUTTEST ABS <dev> <code> min=<m> max=<M>     (ABS_X/Y, ABS_MT_POSITION_X/Y)
 *   INPUTTEST READY devices=<n>
 *   INPUTTEST EV <dev> <type> <code> <value>       (every event but EV_SYN)
 *   INPUTTEST DONE events=<n>
 *
 * Written for displback's tests; uses only the kernel's uapi input ioctls.
 */
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <linux/input.h>

#define MAX_DEVICES 3

static const char *const names[MAX_DEVICES] = {
    "Xen Virtual Keyboard", "Xen Virtual Pointer", "Xen Virtual Multi-touch"};
static const char *const shorts[MAX_DEVICES] = {"kbd", "ptr", "mt"};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void print_abs(int fd, const char *dev, int code)
{
    struct input_absinfo info;
    if (ioctl(fd, EVIOCGABS(code), &info) == 0)
        printf("INPUTTEST ABS %s %d min=%d max=%d\n", dev, code, info.minimum, info.maximum);
}

int main(int argc, char **argv)
{
    int seconds = argc > 1 ? atoi(argv[1]) : 60;
    struct pollfd fds[MAX_DEVICES];
    int which[MAX_DEVICES];
    int count = 0;
    double deadline = now() + 30;

    setvbuf(stdout, NULL, _IOLBF, 0);
    /* The devices appear once xen-kbdfront has probed: look for up to 30 s. */
    while (count < MAX_DEVICES && now() < deadline) {
        count = 0;
        for (int n = 0; n < 32 && count < MAX_DEVICES; n++) {
            char path[64], name[256] = "";
            snprintf(path, sizeof(path), "/dev/input/event%d", n);
            int fd = open(path, O_RDONLY | O_NONBLOCK);
            if (fd < 0)
                continue;
            ioctl(fd, EVIOCGNAME(sizeof(name) - 1), name);
            int kind = -1;
            for (int k = 0; k < MAX_DEVICES; k++)
                if (strcmp(name, names[k]) == 0)
                    kind = k;
            if (kind < 0) {
                close(fd);
                continue;
            }
            fds[count].fd = fd;
            fds[count].events = POLLIN;
            which[count++] = kind;
        }
        if (count < MAX_DEVICES) {
            for (int i = 0; i < count; i++)
                close(fds[i].fd);
            sleep(1);
        }
    }
    for (int i = 0; i < count; i++) {
        printf("INPUTTEST DEVICE %s %s\n", shorts[which[i]], names[which[i]]);
        print_abs(fds[i].fd, shorts[which[i]], ABS_X);
        print_abs(fds[i].fd, shorts[which[i]], ABS_Y);
        print_abs(fds[i].fd, shorts[which[i]], ABS_MT_POSITION_X);
        print_abs(fds[i].fd, shorts[which[i]], ABS_MT_POSITION_Y);
    }
    printf("INPUTTEST READY devices=%d\n", count);
    long events = 0;
    double end = now() + seconds;
    while (now() < end) {
        if (poll(fds, count, 500) <= 0)
            continue;
        for (int i = 0; i < count; i++) {
            struct input_event ev[64];
            ssize_t got = read(fds[i].fd, ev, sizeof(ev));
            for (ssize_t e = 0; got > 0 && e < got / (ssize_t)sizeof(ev[0]); e++) {
                if (ev[e].type == EV_SYN)
                    continue;
                events++;
                printf("INPUTTEST EV %s %d %d %d\n", shorts[which[i]], ev[e].type, ev[e].code,
                       ev[e].value);
            }
        }
    }
    printf("INPUTTEST DONE events=%ld\n", events);
    return 0;
}
