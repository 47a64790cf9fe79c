/*
 * Sizes and ioctl numbers of Linux's evdev and uinput uapi, for displback/evdev/uapi.py.
 * Compiled and run at test time by tests/evdev/test_uapi.py; prints one JSON object.
 * Written for this project.
 */
#include <stdio.h>
#include <linux/input.h>
#include <linux/uinput.h>

int main(void)
{
    printf("{\"sizes\":{\"input_event\":%zu,\"input_absinfo\":%zu,\"uinput_setup\":%zu,"
           "\"uinput_abs_setup\":%zu},", sizeof(struct input_event),
           sizeof(struct input_absinfo), sizeof(struct uinput_setup),
           sizeof(struct uinput_abs_setup));
    printf("\"ioctls\":{");
    printf("\"EVIOCGRAB\":%lu,", (unsigned long)EVIOCGRAB);
    printf("\"EVIOCGNAME(256)\":%lu,", (unsigned long)EVIOCGNAME(256));
    printf("\"EVIOCGBIT(EV_KEY, 96)\":%lu,", (unsigned long)EVIOCGBIT(EV_KEY, 96));
    printf("\"EVIOCGABS(ABS_MT_POSITION_X)\":%lu,", (unsigned long)EVIOCGABS(ABS_MT_POSITION_X));
    printf("\"UI_DEV_CREATE\":%lu,", (unsigned long)UI_DEV_CREATE);
    printf("\"UI_DEV_DESTROY\":%lu,", (unsigned long)UI_DEV_DESTROY);
    printf("\"UI_DEV_SETUP\":%lu,", (unsigned long)UI_DEV_SETUP);
    printf("\"UI_ABS_SETUP\":%lu,", (unsigned long)UI_ABS_SETUP);
    printf("\"UI_SET_EVBIT\":%lu,", (unsigned long)UI_SET_EVBIT);
    printf("\"UI_SET_KEYBIT\":%lu,", (unsigned long)UI_SET_KEYBIT);
    printf("\"UI_SET_RELBIT\":%lu,", (unsigned long)UI_SET_RELBIT);
    printf("\"UI_SET_ABSBIT\":%lu},", (unsigned long)UI_SET_ABSBIT);
    printf("\"codes\":{\"EV_SYN\":%d,\"EV_KEY\":%d,\"EV_REL\":%d,\"EV_ABS\":%d,"
           "\"SYN_REPORT\":%d,\"SYN_DROPPED\":%d,\"REL_X\":%d,\"REL_Y\":%d,\"REL_WHEEL\":%d,"
           "\"ABS_X\":%d,\"ABS_Y\":%d,\"ABS_MT_SLOT\":%d,\"ABS_MT_POSITION_X\":%d,"
           "\"ABS_MT_POSITION_Y\":%d,\"ABS_MT_TRACKING_ID\":%d,\"ABS_CNT\":%d,\"KEY_CNT\":%d,"
           "\"BTN_MOUSE\":%d,\"BTN_TASK\":%d,\"BTN_TOUCH\":%d,\"UINPUT_MAX_NAME_SIZE\":%d}}\n",
           EV_SYN, EV_KEY, EV_REL, EV_ABS, SYN_REPORT, SYN_DROPPED, REL_X, REL_Y, REL_WHEEL,
           ABS_X, ABS_Y, ABS_MT_SLOT, ABS_MT_POSITION_X, ABS_MT_POSITION_Y, ABS_MT_TRACKING_ID,
           ABS_CNT, KEY_CNT, BTN_MOUSE, BTN_TASK, BTN_TOUCH, UINPUT_MAX_NAME_SIZE);
    return 0;
}
