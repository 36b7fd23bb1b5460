// SPDX-License-Identifier: GPL-2.0
/*
 * virtio_tpm: a guest driver for the virtio-tpm device that vtpmd serves
 * with `vtpmd vhost-user` (crosvm's layout: one queue; a request is one
 * descriptor chain with the TPM command in device-readable buffers and room
 * for the response in device-writable ones; both at most 4096 bytes; the
 * used length is the number of response bytes written, 0 on a device error).
 *
 * This module alone is licensed under the GNU General Public License,
 * version 2 (it links against the kernel's GPL-only TPM core). The rest of
 * the vtpmd project keeps its own license.
 *
 * Written for the vtpmd kernel tests. The device has no virtio id in the
 * VIRTIO specification: crosvm uses 62, which is the default here; the
 * `device_id` parameter binds to another id (QEMU's generic vhost-user
 * device only accepts ids that QEMU has a name for).
 *
 * Errors never hang the caller: every request waits at most `timeout_ms`
 * (and a fatal signal ends the wait); a device that is removed wakes the
 * waiter at once with -ENODEV; a response that is empty, shorter than a TPM
 * header, longer than the buffer or whose header disagrees with the length
 * the device reported is -EIO. A request the driver gave up on stays with
 * the device until the device returns it (its late response is dropped);
 * until then new requests fail with -EBUSY instead of queueing behind it.
 */

#include <linux/completion.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/tpm.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <asm/unaligned.h>

/* Exported (GPL) by the TPM core, but declared only in its private header. */
struct tpm_chip *tpmm_chip_alloc(struct device *pdev,
				 const struct tpm_class_ops *ops);
int tpm_chip_register(struct tpm_chip *chip);
void tpm_chip_unregister(struct tpm_chip *chip);

#define VTPM_BUFSIZE 4096	/* the device's limit, and the TPM core's */
#define VTPM_HEADER_SIZE 10	/* tag (2), size (4), code (4) */

static unsigned int device_id = 62;
module_param(device_id, uint, 0444);
MODULE_PARM_DESC(device_id, "virtio device id to bind to (default 62, crosvm's virtio-tpm)");

static unsigned int timeout_ms = 120000;
module_param(timeout_ms, uint, 0644);
MODULE_PARM_DESC(timeout_ms, "longest wait for one TPM response, in ms (default 120000)");

struct vtpm {
	struct virtio_device *vdev;
	struct virtqueue *vq;
	struct tpm_chip *chip;
	spinlock_t lock;		/* the queue and the fields below */
	struct completion done;
	u8 *cmd;			/* device-readable */
	u8 *rsp;			/* device-writable */
	unsigned int rsp_len;		/* bytes the device wrote */
	bool busy;			/* a request is with the device */
	bool abandoned;			/* ... and nobody waits for it */
	bool have_rsp;			/* a response for recv() */
	bool gone;			/* the device is being removed */
};

/* Queue interrupt: the device returned the request. */
static void vtpm_done(struct virtqueue *vq)
{
	struct vtpm *t = vq->vdev->priv;
	unsigned long flags;
	unsigned int len;

	spin_lock_irqsave(&t->lock, flags);
	while (virtqueue_get_buf(vq, &len)) {
		t->busy = false;
		if (t->abandoned) {
			t->abandoned = false;
			dev_info(&vq->vdev->dev, "late response (%u bytes) to an abandoned request dropped\n", len);
			continue;
		}
		t->rsp_len = len;
		t->have_rsp = true;
		complete(&t->done);
	}
	spin_unlock_irqrestore(&t->lock, flags);
}

static int vtpm_send(struct tpm_chip *chip, u8 *buf, size_t len)
{
	struct vtpm *t = dev_get_drvdata(&chip->dev);
	struct scatterlist out, in, *sgs[2] = { &out, &in };
	struct device *dev = &chip->dev;
	bool kick;
	long left;
	int err;

	if (len > VTPM_BUFSIZE || len < VTPM_HEADER_SIZE)
		return -EINVAL;

	spin_lock_irq(&t->lock);
	if (t->gone || virtqueue_is_broken(t->vq)) {
		spin_unlock_irq(&t->lock);
		return -ENODEV;
	}
	if (t->busy) {
		spin_unlock_irq(&t->lock);
		dev_err(dev, "the device still holds a request that timed out; refusing a new one\n");
		return -EBUSY;
	}
	memcpy(t->cmd, buf, len);
	sg_init_one(&out, t->cmd, len);
	sg_init_one(&in, t->rsp, VTPM_BUFSIZE);
	reinit_completion(&t->done);
	t->have_rsp = false;
	t->abandoned = false;
	err = virtqueue_add_sgs(t->vq, sgs, 1, 1, t, GFP_ATOMIC);
	if (err) {
		spin_unlock_irq(&t->lock);
		dev_err(dev, "cannot queue the command: %d\n", err);
		return err;
	}
	t->busy = true;
	kick = virtqueue_kick_prepare(t->vq);
	spin_unlock_irq(&t->lock);
	if (kick && !virtqueue_notify(t->vq))
		dev_warn(dev, "notifying the device failed\n");

	left = wait_for_completion_killable_timeout(&t->done, msecs_to_jiffies(timeout_ms));

	spin_lock_irq(&t->lock);
	if (t->have_rsp) {
		spin_unlock_irq(&t->lock);
		return 0;
	}
	if (t->busy)
		t->abandoned = true;
	err = t->gone ? -ENODEV : left < 0 ? (int)left : -ETIME;
	spin_unlock_irq(&t->lock);
	if (err == -ETIME)
		dev_err(dev, "no response from the device within %u ms\n", timeout_ms);
	else if (err == -ENODEV)
		dev_err(dev, "the device went away during a command\n");
	return err;
}

static int vtpm_recv(struct tpm_chip *chip, u8 *buf, size_t count)
{
	struct vtpm *t = dev_get_drvdata(&chip->dev);
	struct device *dev = &chip->dev;
	unsigned int len;

	spin_lock_irq(&t->lock);
	if (!t->have_rsp) {
		spin_unlock_irq(&t->lock);
		return -EIO;
	}
	t->have_rsp = false;
	len = t->rsp_len;
	spin_unlock_irq(&t->lock);

	if (len == 0) {
		dev_err(dev, "the device returned no response (device error)\n");
		return -EIO;
	}
	if (len < VTPM_HEADER_SIZE || len > VTPM_BUFSIZE) {
		dev_err(dev, "response of %u bytes is not a TPM response\n", len);
		return -EIO;
	}
	if (get_unaligned_be32(t->rsp + 2) != len) {
		dev_err(dev, "response header says %u bytes, the device wrote %u\n",
			get_unaligned_be32(t->rsp + 2), len);
		return -EIO;
	}
	if (len > count)
		return -EIO;
	memcpy(buf, t->rsp, len);
	return len;
}

/* Responses arrive by interrupt (TPM_CHIP_FLAG_IRQ): send() waits for them,
 * so the core never polls status(). A request cannot be withdrawn from a
 * virtqueue; cancel() has nothing to do. */
static u8 vtpm_status(struct tpm_chip *chip)
{
	return 0;
}

static void vtpm_cancel(struct tpm_chip *chip)
{
}

static bool vtpm_req_canceled(struct tpm_chip *chip, u8 status)
{
	return false;
}

static const struct tpm_class_ops vtpm_ops = {
	.flags = TPM_OPS_AUTO_STARTUP,
	.send = vtpm_send,
	.recv = vtpm_recv,
	.status = vtpm_status,
	.cancel = vtpm_cancel,
	.req_canceled = vtpm_req_canceled,
	.req_complete_mask = 0,
	.req_complete_val = 0,
};

static int vtpm_probe(struct virtio_device *vdev)
{
	struct vtpm *t;
	int err;

	t = devm_kzalloc(&vdev->dev, sizeof(*t), GFP_KERNEL);
	if (!t)
		return -ENOMEM;
	t->cmd = devm_kmalloc(&vdev->dev, VTPM_BUFSIZE, GFP_KERNEL);
	t->rsp = devm_kmalloc(&vdev->dev, VTPM_BUFSIZE, GFP_KERNEL);
	if (!t->cmd || !t->rsp)
		return -ENOMEM;
	t->vdev = vdev;
	spin_lock_init(&t->lock);
	init_completion(&t->done);
	vdev->priv = t;

	t->vq = virtio_find_single_vq(vdev, vtpm_done, "tpm-requests");
	if (IS_ERR(t->vq))
		return PTR_ERR(t->vq);

	t->chip = tpmm_chip_alloc(&vdev->dev, &vtpm_ops);
	if (IS_ERR(t->chip)) {
		err = PTR_ERR(t->chip);
		goto del_vqs;
	}
	dev_set_drvdata(&t->chip->dev, t);
	t->chip->flags |= TPM_CHIP_FLAG_TPM2 | TPM_CHIP_FLAG_IRQ;

	virtio_device_ready(vdev);
	err = tpm_chip_register(t->chip);
	if (err) {
		dev_err(&vdev->dev, "tpm_chip_register failed: %d\n", err);
		goto reset;
	}
	dev_info(&vdev->dev, "virtio-tpm (virtio id %u) is %s\n", vdev->id.device,
		 dev_name(&t->chip->dev));
	return 0;

reset:
	virtio_reset_device(vdev);
del_vqs:
	vdev->config->del_vqs(vdev);
	return err;
}

static void vtpm_remove(struct virtio_device *vdev)
{
	struct vtpm *t = vdev->priv;

	/* Wake a caller waiting for a response that will not come. */
	spin_lock_irq(&t->lock);
	t->gone = true;
	complete(&t->done);
	spin_unlock_irq(&t->lock);

	tpm_chip_unregister(t->chip);	/* no send()/recv() after this */
	virtio_reset_device(vdev);	/* the device lets go of the buffers */
	vdev->config->del_vqs(vdev);
	/* The buffers and the chip are released by devres. */
}

/* Filled in from device_id at load time; MODULE_DEVICE_TABLE records 62. */
static struct virtio_device_id vtpm_ids[] = {
	{ 62, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, vtpm_ids);

static struct virtio_driver vtpm_driver = {
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.id_table = vtpm_ids,
	.probe = vtpm_probe,
	.remove = vtpm_remove,
};

static int __init vtpm_init(void)
{
	if (device_id == 0 || device_id == VIRTIO_DEV_ANY_ID) {
		pr_err("virtio_tpm: device_id=%u is not a device id\n", device_id);
		return -EINVAL;
	}
	vtpm_ids[0].device = device_id;
	return register_virtio_driver(&vtpm_driver);
}

static void __exit vtpm_exit(void)
{
	unregister_virtio_driver(&vtpm_driver);
}

module_init(vtpm_init);
module_exit(vtpm_exit);

MODULE_DESCRIPTION("TPM 2.0 over virtio (crosvm's virtio-tpm layout), for vtpmd");
MODULE_LICENSE("GPL");
